"""The multi-tenant daemon: HTTP API, tenants, quotas, workflow registry."""
