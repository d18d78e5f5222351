"""Old path of :mod:`moerouter.methods.confidence`, kept: ``mr.confidence`` is public.

``import moerouter.confidence`` and ``from moerouter.confidence import ...`` (the public path
spelled as an import) keep working without a warning: this module replaces itself with the new
one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.confidence`.
"""

from moerouter._moved import replace_module
from moerouter.methods import confidence

replace_module(__name__, confidence, deprecated=False)
