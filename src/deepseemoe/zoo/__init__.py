"""The small models the project trains itself for the offline default."""
