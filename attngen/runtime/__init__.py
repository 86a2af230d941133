"""What runs at call time: input checks, the ``attngen::`` custom ops, the built cubins
loaded by the launchers, and the registry that picks a kernel for a call."""
