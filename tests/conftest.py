pytest_plugins = ["anyservice.testing.pytest_plugin"]
