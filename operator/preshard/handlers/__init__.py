"""kopf handlers. Importing :mod:`preshard.handlers.checkpoint` registers them."""
