"""Service discovery and the local stack: where Ray, MLflow and object storage are, and starting them.

`cluster.endpoints.resolve` is the one resolver every other package uses.
"""
