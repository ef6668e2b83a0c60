-- Inferred members: merchants the facts name before MongoDB knows them.
ALTER TABLE dim_merchant ADD COLUMN IF NOT EXISTS is_inferred BOOLEAN NOT NULL DEFAULT false;
