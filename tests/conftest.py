# The project's plugin, and the `spans` fixture (OpenTelemetry spans a test made, read back
# from the real SDK).
pytest_plugins = ["anyservice.testing.pytest_plugin", "tests.otel_helpers"]
