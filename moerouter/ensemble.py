"""Old path of :mod:`moerouter.methods.ensemble`, kept: ``mr.ensemble`` is public.

``import moerouter.ensemble`` and ``from moerouter.ensemble import ...`` (the public path
spelled as an import) keep working without a warning: this module replaces itself with the new
one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.ensemble`.
"""

from moerouter._moved import replace_module
from moerouter.methods import ensemble

replace_module(__name__, ensemble, deprecated=False)
