"""The foundation every layer may import: the error type shown to users as one line, and the checks that
configs run at construction (types, choices, removed keys)."""
