"""featurebank.search"""
