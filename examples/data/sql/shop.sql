-- A small shop: customers, products and orders.
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT NOT NULL);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL,
    ordered_on TEXT NOT NULL
);
INSERT INTO customers VALUES (1, 'Ada', 'UK'), (2, 'Grace', 'US'), (3, 'Linus', 'FI'), (4, 'Barbara', 'US');
INSERT INTO products VALUES
    (1, 'Keyboard', 'hardware', 49.0), (2, 'Monitor', 'hardware', 199.0),
    (3, 'IDE licence', 'software', 89.0), (4, 'Cloud credits', 'software', 25.0);
INSERT INTO orders VALUES
    (1, 1, 1, 2, '2026-10-01'), (2, 1, 3, 1, '2026-10-03'), (3, 2, 2, 1, '2026-10-04'),
    (4, 2, 4, 10, '2026-10-09'), (5, 3, 1, 1, '2026-10-11'), (6, 4, 2, 2, '2026-10-15'),
    (7, 4, 3, 3, '2026-10-20'), (8, 3, 4, 4, '2026-10-28');
