package app.authz

# Role-based access: a user may act on a resource when one of their roles
# grants the action on a matching resource pattern.

default allow := false

allow if {
	some role in data.app.users[input.user].roles
	some grant in data.app.roles[role].grants
	grant.action in {input.action, "*"}
	glob.match(grant.resource, ["/"], input.resource)
}

reasons contains msg if {
	not data.app.users[input.user]
	msg := sprintf("unknown user %q", [input.user])
}
