def evaluate_classifier(): pass
