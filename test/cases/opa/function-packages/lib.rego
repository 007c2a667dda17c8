package lib

# A package of functions only: it shows in data as an empty object, which
# is not a base document and must not be stored as one.
double(x) := 2 * x
