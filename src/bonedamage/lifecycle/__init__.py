"""Model lifecycle: MLflow tracking of the learning stages, registry and regression gate."""
