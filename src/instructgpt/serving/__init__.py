"""An OpenAI-compatible API for a trained model: ``instructgpt serve`` (see cli.py), with dynamic batching
(engine.py), API keys, rate limits and an audit log (security.py)."""
