// Stands in for @daily-co/daily-js in the dashboard's bundle (see build.sh): Cattery's talk
// page never uses Daily's call object, which would load code from Daily's servers.
const unavailable = () => {
  throw new Error("Daily's call object is not part of Cattery's dashboard");
};
const Daily = { createCallObject: unavailable, getCallInstance: () => undefined };
export default Daily;
