"""Old path of :mod:`moerouter.methods.merging`, kept: ``mr.merging`` is public.

``import moerouter.merging`` and ``from moerouter.merging import ...`` (the public path spelled
as an import) keep working without a warning: this module replaces itself with the new one, so
both paths give the same module object. New code imports from :mod:`moerouter.methods.merging`.
"""

from moerouter._moved import replace_module
from moerouter.methods import merging

replace_module(__name__, merging, deprecated=False)
