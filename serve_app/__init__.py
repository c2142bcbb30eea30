"""The HTTP API (a FastAPI ingress deployment), the Serve application builder and the CLI."""
