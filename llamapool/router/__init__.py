"""HTTP layer: Starlette app, OpenAI endpoints, operations endpoints."""
