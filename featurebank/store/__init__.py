"""featurebank.store"""
