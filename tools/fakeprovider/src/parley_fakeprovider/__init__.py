"""A fake OpenAI/Anthropic upstream that speaks both wire formats, for development, tests and benchmarks"""
