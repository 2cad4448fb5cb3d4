"""Parley jobs service: files and batches over RabbitMQ"""
