"""Network adapters exposing F(x_t, t, r, cond) with signed time."""
