"""Deprecated import path: this module moved to :mod:`moerouter.gates.cosine`.

Its functions stay in :mod:`moerouter.policies` and :mod:`moerouter` (no warning). ``import
moerouter.policies.cosine`` still works and gives the same module object (with a
:class:`DeprecationWarning`); import from :mod:`moerouter.gates.cosine` instead.
"""

import sys
import warnings

from moerouter.gates import cosine as _moved

warnings.warn(
    "moerouter.policies.cosine moved to moerouter.gates.cosine; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
