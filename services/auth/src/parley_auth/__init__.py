"""Parley auth service: users, tokens, API keys, service identities"""
