"""Jinja2 templates (cloud-init user data, remote scripts, the run report), shipped as package data."""
