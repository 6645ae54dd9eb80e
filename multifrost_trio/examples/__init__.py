"""Example workers shipped with the package (the demo uses ``math_worker``)."""
