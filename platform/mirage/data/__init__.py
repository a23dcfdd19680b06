"""mirage.data"""
