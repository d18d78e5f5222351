"""moerouter's public conformance kit: float64 references, assertion helpers, the backend enum.

Backend plugins test themselves with it: ``pytest_plugins = ["moerouter.testing.fixtures"]``
gives the ``backend`` and ``xp`` fixtures.
"""

from moerouter.testing.backends import Backend, to_numpy

__all__ = ["Backend", "to_numpy"]
