"""The package version (one place: `jaxpaged.__version__`, /version and the OpenAPI spec read it)."""
__version__ = "0.1.0"
