"""Value types shared by recording, the store and the trainer (pure): page keys (``prefix``),
recorded-row views (``records``) and the record plan (``plan``). Imports nothing of the package
but ``errors``.
"""
