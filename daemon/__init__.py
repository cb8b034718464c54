"""irsa-cache: a node-local cache of IRSA credentials for Kubernetes on AWS."""

__version__ = "0.1.0"
