from hypothesis import HealthCheck, Phase, settings

# The project's plugin, the `spans` fixture (OpenTelemetry spans a test made, read back
# from the real SDK), and the per-test CPU limit mutation testing asks for.
pytest_plugins = ["anyservice.testing.pytest_plugin", "tests.otel_helpers", "tests.cpu_limit"]

# Hypothesis' deadline and its too-slow health check judge wall-clock speed, which on a
# shared or loaded machine says nothing about the code: the tests check what happens,
# never how fast.
settings.register_profile("anyservice", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("anyservice")
# Mutation testing (`--hypothesis-profile=mutation`) asks only whether a test fails: the
# failing example is not shrunk (which takes long, and longer than the per-test CPU limit
# for some mutants), nor saved for the next mutant.
settings.register_profile(
    "mutation",
    parent=settings.get_profile("anyservice"),
    phases=[Phase.explicit, Phase.generate],
    database=None,
)
