-- The demo's sample schema: the kinds of objects pgflip carries over.
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped');
CREATE DOMAIN positive_amount AS numeric(12,2) CHECK (VALUE > 0);
CREATE TYPE address AS (street text, city text);

CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    home address,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id bigserial,
    customer_id bigint NOT NULL REFERENCES customers(id),
    status order_status NOT NULL DEFAULT 'new',
    amount positive_amount NOT NULL,
    amount_with_tax numeric GENERATED ALWAYS AS (amount * 1.2) STORED,
    placed date NOT NULL DEFAULT current_date,
    PRIMARY KEY (id, placed)
) PARTITION BY RANGE (placed);
CREATE TABLE orders_old PARTITION OF orders FOR VALUES FROM (MINVALUE) TO ('2026-01-01');
CREATE TABLE orders_new PARTITION OF orders FOR VALUES FROM ('2026-01-01') TO (MAXVALUE);
CREATE SEQUENCE invoice_numbers START 1000;
CREATE TABLE audit_log (id bigserial PRIMARY KEY, what text NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION audit_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (what) VALUES ('order ' || NEW.id || ' ' || NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER orders_audit AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION audit_order();
CREATE VIEW paid_orders AS SELECT * FROM orders WHERE status = 'paid';
CREATE MATERIALIZED VIEW revenue_by_day AS SELECT placed, sum(amount) AS revenue FROM orders GROUP BY placed;

INSERT INTO customers (name, home)
SELECT 'customer ' || g, ROW(g || ' Main St', 'Springfield')::address FROM generate_series(1, 2000) g;
INSERT INTO orders (customer_id, status, amount, placed)
SELECT 1 + g % 2000, (ARRAY['new','paid','shipped'])[1 + g % 3]::order_status, 1 + (g % 500),
       DATE '2025-06-01' + (g % 400)
FROM generate_series(1, 20000) g;
SELECT nextval('invoice_numbers') FROM generate_series(1, 5);
REFRESH MATERIALIZED VIEW revenue_by_day;

-- An insert-only table without a primary key: carried with REPLICA IDENTITY FULL (a warning says so).
CREATE TABLE page_views (path text NOT NULL, at timestamptz NOT NULL DEFAULT now());
INSERT INTO page_views (path) SELECT '/p/' || g FROM generate_series(1, 500) g;
