"""mirage.model"""
