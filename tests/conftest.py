from hypothesis import HealthCheck, settings

# The project's plugin, and the `spans` fixture (OpenTelemetry spans a test made, read back
# from the real SDK).
pytest_plugins = ["anyservice.testing.pytest_plugin", "tests.otel_helpers"]

# Hypothesis' deadline and its too-slow health check judge wall-clock speed, which on a
# shared or loaded machine says nothing about the code: the tests check what happens,
# never how fast.
settings.register_profile("anyservice", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("anyservice")
