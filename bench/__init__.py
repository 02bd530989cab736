"""The benchmark, the load run and the MongoDB stand-ins' wire protocol: tools
that measure the service, kept apart from it.

Each script runs as a module from the checkout root
(``python -m bench.bench_image_service``), so that the service's modules and
this package import by the same names in the script, in the processes it
spawns, and in the tests that use them.
"""
