"""featurebank.service"""
