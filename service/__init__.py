"""corefleet's server side: the gateway, the job store, the runner and the engines.

Importing this package is cheap on purpose: engines (Celery, Ray, Dask, CuPy, Numba) are
imported only by the modules that use them, when they are used.
"""
