pytest_plugins = ["moerouter.testing.fixtures"]
