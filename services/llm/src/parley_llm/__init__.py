"""Parley llm service: OpenAI/Anthropic-compatible inference, routing and the usage ledger"""
