"""Old path of :mod:`moerouter.methods.confidence`, kept: ``mr.confidence`` is public.

``import moerouter.confidence`` and ``from moerouter.confidence import ...`` (the public path
spelled as an import) keep working without a warning: this module replaces itself with the new
one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.confidence`.
"""

import sys

from moerouter.methods import confidence as _moved

sys.modules[__name__] = _moved
