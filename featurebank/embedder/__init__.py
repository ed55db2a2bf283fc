"""featurebank.embedder"""
