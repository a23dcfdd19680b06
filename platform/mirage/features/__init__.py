"""mirage.features"""
