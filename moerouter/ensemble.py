"""Old path of :mod:`moerouter.methods.ensemble`, kept: ``mr.ensemble`` is public.

``import moerouter.ensemble`` and ``from moerouter.ensemble import ...`` (the public path
spelled as an import) keep working without a warning: this module replaces itself with the new
one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.ensemble`.
"""

import sys

from moerouter.methods import ensemble as _moved

sys.modules[__name__] = _moved
