"""featurebank.classifiers"""
