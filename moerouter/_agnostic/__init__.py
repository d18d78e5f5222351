"""Array-API implementations: the reference for every backend kernel, and the fallback.

Private helpers here take ``xp`` as a required keyword; the public layer infers it once.
"""
