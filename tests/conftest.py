pytest_plugins = ["moerouter.testing.fixtures"]


def pytest_configure(config):
    # A failing hypothesis test pretty-prints its example by inspecting loaded modules, which
    # touches mypy_extensions' deprecated TypedDict where mypy is installed; with warnings as
    # errors that would replace the falsifying example with an INTERNALERROR.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )
