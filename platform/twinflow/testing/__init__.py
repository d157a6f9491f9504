"""Test and benchmark helpers that run real services (never mocks): the SeaweedFS S3 server."""
