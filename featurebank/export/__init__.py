"""featurebank.export"""
