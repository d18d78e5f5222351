"""Deprecated import path: this module moved to :mod:`moerouter.gates.noise`.

Its functions stay in :mod:`moerouter.policies` and :mod:`moerouter` (no warning). ``import
moerouter.policies.noise`` still works and gives the same module object (with a
:class:`DeprecationWarning`); import from :mod:`moerouter.gates.noise` instead.
"""

import sys
import warnings

from moerouter.gates import noise as _moved

warnings.warn(
    "moerouter.policies.noise moved to moerouter.gates.noise; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
