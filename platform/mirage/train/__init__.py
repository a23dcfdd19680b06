"""mirage.train"""
