"""Parley gateway: the one public door"""
